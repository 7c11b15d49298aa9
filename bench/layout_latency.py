"""Layout decision latency: in-process (engine only) and over HTTP (gunicorn, 2 workers) under load.

Prints JSON lines. Targets (foundation): in-process p99 < 2 ms; HTTP p99 < 20 ms at 200 requests/s.
Usage: python bench/layout_latency.py [--requests N] [--rate R] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def emit(**kw):
    kw["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(kw), flush=True)


def in_process(n: int) -> None:
    from allocator import parse_config_text
    from policy_api.engine import DecisionEngine, RequestIds, build_state
    from policy_api.log import read_catalog_csv
    from simulator import make_world

    world = make_world(n_users=2000, n_items=3000, seed=0)
    with tempfile.TemporaryDirectory() as d:
        world.to_catalog_csv(Path(d) / "items.csv")
        cfg = parse_config_text(world.default_config_toml())
        cat = read_catalog_csv(Path(d) / "items.csv", cfg.category_names)
    state = build_state(cfg, cat, prices=np.array([0.3, 0.2]))
    eng = DecisionEngine(state)
    ids = RequestIds(b"bench")
    users = [str(u) for u in world.user_ids[:500]]
    for k in range(200):
        eng.decide(users[k % 500], ids.issue())
    t = np.empty(n)
    for k in range(n):
        rid = ids.issue()
        t0 = time.perf_counter()
        d = eng.decide(users[k % 500], rid)
        t[k] = time.perf_counter() - t0
        assert not d.fallback, d.fallback_reason
    emit(bench="layout_in_process", n=n, pool_size=cfg.pool_size, n_candidates=len(d.candidates),
         p50_ms=float(np.percentile(t, 50) * 1e3), p99_ms=float(np.percentile(t, 99) * 1e3),
         mean_ms=float(t.mean() * 1e3), target_p99_ms=2.0)


def http(rate: float, duration: float, threads: int = 4) -> None:
    import requests

    from simulator import make_world

    world = make_world(n_users=2000, n_items=3000, seed=0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        env = dict(os.environ, DATABASE_URL=f"sqlite:///{d / 'h.db'}", HOMEPAGE_DATA_DIR=str(d))
        (d / "homepage.toml").write_text(world.default_config_toml())
        world.to_catalog_csv(d / "items.csv")
        run = lambda *a: subprocess.run([sys.executable, "-m", "policy_api.cli", *a], env=env, check=True,  # noqa: E731
                                        capture_output=True)
        run("catalog", "load", str(d / "items.csv"), "--config", str(d / "homepage.toml"))
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--config", str(d / "homepage.toml"),
                                 "--port", str(port), "--workers", "2", "--threads", str(threads)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if requests.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            # open-loop load at a fixed rate from several client threads (latency includes queueing)
            n = int(rate * duration)
            lat = np.full(n, np.nan)
            start = time.perf_counter() + 0.5
            nthreads = 16
            users = [str(u) for u in world.user_ids]

            def client(tid: int) -> None:
                s = requests.Session()
                for k in range(tid, n, nthreads):
                    due = start + k / rate
                    now = time.perf_counter()
                    if due > now:
                        time.sleep(due - now)
                    r = s.get(url + "/layout", params={"user_id": users[k % len(users)]}, timeout=10)
                    lat[k] = time.perf_counter() - due  # open loop: from the scheduled send time
                    assert r.status_code == 200

            ths = [threading.Thread(target=client, args=(i,)) for i in range(nthreads)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            wall = time.perf_counter() - t0
            emit(bench="layout_http", workers=2, threads_per_worker=threads, offered_rate=rate, achieved_rate=n / (wall - 0.5), n=n,
                 p50_ms=float(np.nanpercentile(lat, 50) * 1e3), p99_ms=float(np.nanpercentile(lat, 99) * 1e3),
                 target_p99_ms=20.0, note="client and server share the machine's 2 cores")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="gthread threads per worker to compare")
    a = ap.parse_args()
    in_process(a.requests)
    for th in a.threads:
        http(a.rate, a.duration, th)
